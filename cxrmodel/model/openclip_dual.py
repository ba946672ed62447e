"""`OpenClipDualEncoder`: a `VisionTextDualEncoderModel` pooled and projected as open_clip's timm-ViT +
Hugging Face text models are (BiomedCLIP): the image's class token after the final norm, the text's
first token of the last hidden state, and open_clip's text projection (one linear map, or an MLP).
"""

from __future__ import annotations

from torch import nn
from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel


class OpenClipDualEncoder(VisionTextDualEncoderModel):
    """Built by `cxrmodel.model.openclip` from an open_clip checkpoint (never saved in this form)."""

    @classmethod
    def build(cls, vision_model, text_model, projection_dim: int, text_proj: str = "linear",
              text_proj_hidden: int | None = None) -> OpenClipDualEncoder:
        """Wrap the two towers; `text_proj` "mlp" is Linear -> GELU -> Linear (no biases), as open_clip's."""
        config = VisionTextDualEncoderConfig.from_vision_text_configs(vision_model.config, text_model.config,
                                                                      projection_dim=projection_dim)
        model = cls(config=config, vision_model=vision_model, text_model=text_model)
        if text_proj == "mlp":
            width = text_model.config.hidden_size
            hidden = text_proj_hidden or (width + projection_dim) // 2
            model.text_projection = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                                                  nn.Linear(hidden, projection_dim, bias=False))
        return model

    def get_image_features(self, pixel_values=None, **kwargs):
        """Projected class token of the last hidden state (after the ViT's final norm)."""
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return self.visual_projection(hidden[:, 0])

    def get_text_features(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        """Projected first token of the text model's last hidden state."""
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state
        return self.text_projection(hidden[:, 0])
