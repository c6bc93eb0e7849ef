"""Built-in methods; importing this package registers them."""
from ddlm.methods import ar, bd3, edlm, mdlm, sedd  # noqa: F401
from ddlm.methods.base import LossOutput, Method, MethodConfig, NLLBound, method_class, method_names, register

__all__ = ["LossOutput", "Method", "MethodConfig", "NLLBound", "method_class", "method_names", "register"]
