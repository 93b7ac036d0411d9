"""The project package of the example chat site."""
