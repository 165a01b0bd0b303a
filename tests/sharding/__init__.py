"""Logical axis rules, meshes and activation constraints."""
