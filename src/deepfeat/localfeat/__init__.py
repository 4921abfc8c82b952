"""Local features: keypoints and regional descriptors per image, their cache in a store, and spatial
verification of a global ranking."""
