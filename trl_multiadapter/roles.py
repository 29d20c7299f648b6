"""Role and adapter names shared by the model, the config and the recipe (no heavy imports)."""

POLICY, VALUE, REWARD, REFERENCE = "policy", "value", "reward", "reference"
VALUE_MODELS = ("head", "critic")  # value head on the policy's hidden states, or a LoRA critic adapter
REFERENCE_MODES = ("base", "policy_init")  # adapters disabled, or a frozen copy of the starting adapter
