"""Flower ClientApp of liquid-fed."""
