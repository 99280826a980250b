"""The image library: CLIP embeddings of your images in named collections, searched by text, image or vector."""
