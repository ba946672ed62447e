"""`search.Engine`: text, image, label and report queries over one data dir."""
