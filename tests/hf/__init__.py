"""Hugging Face interchange: config.json and safetensors in and out."""
