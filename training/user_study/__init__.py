"""The user-study evaluator (paper, appendix §2.2): annotators' boxes against ground truth, and
what each model makes of them. ``python -m training.user_study {collect,evaluate,demo}``.

Modules: ``ls_export`` (reading Label Studio exports), ``ground_truth`` (mask folders, COCO,
brushes), ``matching`` (boxes to objects), ``box_quality``, ``segmentation`` (Table 3),
``consensus`` (several annotators' masks merged, against one), ``evaluate`` (the pipeline),
``report`` (outputs), ``collect`` (setting up a study), ``demo`` (a simulated study),
``models``, ``images``, ``loaders``, ``cli``; Label Studio itself through the adapter,
``labelstudio``.
"""

from training.user_study.evaluate import EvaluationConfig, StudyResult, evaluate_study

__all__ = ["EvaluationConfig", "StudyResult", "evaluate_study"]
