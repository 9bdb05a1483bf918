"""The data contract and what reads it: configs, folder layout, CLIP encoders, embedding shards, indices.

Imports without Ray or Lightning, so every job and trainer can build on it.
"""
