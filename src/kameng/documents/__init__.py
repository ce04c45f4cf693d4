"""Qualification documents: what a buyer uploads for products that require one."""
