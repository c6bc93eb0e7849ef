"""Placeholder: MDLM is being written (issue 4)."""
