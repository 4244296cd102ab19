"""Data: video reading, CLIP preprocessing, prompts and labels, the training loader."""
