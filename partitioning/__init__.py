"""Logical axis names, rule tables, meshes and the partitioner."""
