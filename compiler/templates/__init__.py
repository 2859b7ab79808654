"""Jinja templates shipped as package data (a package so setuptools includes the *.j2 files)."""
