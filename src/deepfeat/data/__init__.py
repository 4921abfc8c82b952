"""Images in: finding files, decoding them robustly, the model's preprocessing, decode workers."""
