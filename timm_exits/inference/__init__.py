"""Adaptive inference: anytime and budgeted evaluation, threshold search, the early-exit executor,
export for deployment."""
from .outputs import ExitOutputs, anytime_accuracy, collect_outputs
from .policies import POLICIES, exit_scores
from .budgeted import (IMTA_Q, REFERENCE_Q, BudgetPoint, Thresholds, assign_exits, budgeted_curve, fit_thresholds,
                       geometric_fractions, thresholds_for_accuracy, thresholds_for_cost)
from .executor import EarlyExitExecutor, ExitResult
from .export import ExportedModel, export_model

__all__ = ["ExitOutputs", "anytime_accuracy", "collect_outputs", "POLICIES", "exit_scores", "IMTA_Q", "REFERENCE_Q",
           "BudgetPoint", "Thresholds", "assign_exits", "budgeted_curve", "fit_thresholds", "geometric_fractions",
           "thresholds_for_accuracy", "thresholds_for_cost", "EarlyExitExecutor", "ExitResult", "ExportedModel",
           "export_model"]
