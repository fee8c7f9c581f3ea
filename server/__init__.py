"""Flower ServerApp of liquid-fed."""
