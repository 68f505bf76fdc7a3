"""Helpers shared by stages: a layer below them that imports no stage.

Stages share code through here, never by importing each other (a test checks both directions).
"""
