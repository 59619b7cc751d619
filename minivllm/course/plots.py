"""Plots shared by the notebooks. (Filled in by phase 01.)"""
