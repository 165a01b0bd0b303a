"""Hugging Face interchange: config.json <-> Config, safetensors weights in and out, the experts' layouts."""
