"""Model: backbones + projection head → L2-normalised embeddings, pretrained weights, save/load and inference."""
