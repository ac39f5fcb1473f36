"""Stages: one function per MLproject entry point, each given its config and a tracker."""
