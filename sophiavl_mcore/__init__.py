"""sophiavl_mcore: Trust-GRPO training of vision-language policies on Megatron-Core + vLLM.

See README.md, and docs/DESIGN.md for the module map.
"""

__version__ = "0.1.0"
