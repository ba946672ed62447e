"""Reading one image: raster and DICOM decoding, and the model's input preprocessing."""
