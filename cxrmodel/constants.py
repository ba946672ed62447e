"""Names every layer shares: the product version, the default data dir, the 14 pathologies.

The one home for them; any layer may import this module (it imports nothing).
"""

VERSION = "0.1.0"

DEFAULT_DATA_DIR = "radlens-data"
THUMBS_DIR = "thumbs"  # in a data dir: thumbnails servers cache, named CONTENTHASH-SIZE.png

PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
