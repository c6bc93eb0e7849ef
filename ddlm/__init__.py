"""ddlm: discrete diffusion language models (MDLM, SEDD, BD3-LM, EDLM) beside an AR baseline."""
__version__ = "0.1.0"
