"""The pipeline: a recipe's stages in order, skip-if-done, and the run report.

``runner`` runs the stages and owns the run-folder conventions (stage markers, fingerprints); one module
per built-in stage (``data_stage``, ``reward_stage``, ``ppo_stage``, ``evaluate_stage``, ``export_stage``)
registers it with ``trl_multiadapter.registry``; ``synthetic_sources`` registers the offline data sources.
Importing the package registers all of them. Every name below keeps its ``trl_multiadapter.pipeline``
import path.
"""

from ..recipe import DEFAULT_STAGES
from .data_stage import (
    DATA_FILES,
    DATA_REPORT_FILE,
    call_data_source,
    check_data_sources,
    data_stage,
    data_stage_pending,
    load_stage_dataset,
    load_train_and_eval,
    resolve_split_files,
)
from .evaluate_stage import evaluate_stage, load_trained_model
from .export_stage import export_stage
from .ppo_stage import LOG_HISTORY_FILE, PPO_FINAL_DIR, ppo_config_for, ppo_stage, trainer_checkpoint_step
from .reward_stage import reward_stage
from .runner import (
    BASE_MODEL_DIR,
    RECIPE_FILE,
    REPORT_JSON,
    REPORT_MD,
    STAGE_INPUTS,
    STAGE_MARKER,
    RunReport,
    StageContext,
    StageFailedError,
    StageOutcome,
    StageResult,
    read_stage_marker,
    run_pipeline,
    stage_fingerprint,
    write_stage_marker,
)
from .shared import base_model_path, load_tokenizer, materialise_base_model
from .synthetic_sources import synthetic_hh_rlhf, synthetic_squad

__all__ = [
    "BASE_MODEL_DIR", "DATA_FILES", "DATA_REPORT_FILE", "DEFAULT_STAGES", "LOG_HISTORY_FILE", "PPO_FINAL_DIR",
    "RECIPE_FILE", "REPORT_JSON", "REPORT_MD", "STAGE_INPUTS", "STAGE_MARKER", "RunReport", "StageContext",
    "StageFailedError", "StageOutcome", "StageResult", "base_model_path", "call_data_source", "check_data_sources",
    "data_stage", "data_stage_pending", "evaluate_stage", "export_stage", "load_stage_dataset", "load_tokenizer",
    "load_train_and_eval", "load_trained_model", "materialise_base_model", "ppo_config_for", "ppo_stage",
    "read_stage_marker", "resolve_split_files", "reward_stage", "run_pipeline", "stage_fingerprint",
    "synthetic_hh_rlhf", "synthetic_squad", "trainer_checkpoint_step", "write_stage_marker",
]
