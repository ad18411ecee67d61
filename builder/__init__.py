"""Build container images from Nix packages on demand and serve them over the registry pull API."""
