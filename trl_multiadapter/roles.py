"""Role and adapter names shared by the model, the config and the recipe (no heavy imports)."""

POLICY, VALUE, REWARD, REFERENCE = "policy", "value", "reward", "reference"
NO_VALUE_MODEL = "none"  # critic-free advantage estimators: no value head, no critic
# value head on the policy's hidden states, a LoRA critic adapter, or none
VALUE_MODELS = ("head", "critic", NO_VALUE_MODEL)
REFERENCE_MODES = ("base", "policy_init")  # adapters disabled, or a frozen copy of the starting adapter
