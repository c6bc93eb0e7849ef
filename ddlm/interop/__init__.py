"""Interop with other ecosystems: published checkpoints into ddlm run directories (`import_`),
ddlm runs into Hugging Face folders (`export`), and the lm-eval-harness model (`lm_eval`). Each
maps keys explicitly and is proven by equal logits in tests."""
