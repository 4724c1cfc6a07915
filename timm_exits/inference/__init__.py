"""Adaptive inference: one ``evaluate`` returning a typed report, exit policies, anytime and budgeted
evaluation, threshold search, threshold sweeps and cost tables, calibration, anytime predictors (PA / CA)
and risk-controlled thresholds, the early-exit executor and its latency, export for deployment."""
from ..quotas import geometric_fractions
from .outputs import PREDICTORS, ExitOutputs, anytime_accuracy, collect_outputs, predictor_of
from .policies import FALLBACKS, POLICIES, SCORES, ExitPolicy, exit_scores, resolve_policy
from .budgeted import (IMTA_Q, Q_GRIDS, REFERENCE_Q, BudgetPoint, Thresholds, assign_exits, budgeted_curve,
                       exit_metrics, fit_thresholds, flat_envelope, thresholds_for_accuracy, thresholds_for_cost)
from .executor import EarlyExitExecutor, ExitResult, weights_sha256
from .protocols import (COST_FRACTIONS, SDN_GRID, SDN_POLICY, ZTW_GRID, ZTW_POLICY, SweepPoint, accuracy_at_cost,
                        measure_latency, patience_sweep, threshold_sweep)
from .calibration import ECE_BINS, calibration_metrics, curve_calibration, exit_calibration
from .anytime import caching_anytime, conditional_monotonicity, ground_truth_probability, product_anytime
from .risk_control import RC_POLICY, RiskControl, lambda_losses, risk_controlled_thresholds, select_lambda
from .export import ExportedModel, export_model, manifest_sha256
from .report import EvaluationReport
from .evaluation import THRESHOLDS_FILE, evaluate

__all__ = ["ExitOutputs", "anytime_accuracy", "collect_outputs", "FALLBACKS", "POLICIES", "SCORES", "ExitPolicy",
           "exit_scores", "resolve_policy", "IMTA_Q", "Q_GRIDS", "REFERENCE_Q", "BudgetPoint", "Thresholds",
           "assign_exits", "budgeted_curve", "exit_metrics", "fit_thresholds", "flat_envelope", "geometric_fractions",
           "thresholds_for_accuracy", "thresholds_for_cost", "EarlyExitExecutor", "ExitResult", "weights_sha256",
           "COST_FRACTIONS",
           "SDN_GRID", "SDN_POLICY", "ZTW_GRID", "ZTW_POLICY", "SweepPoint", "accuracy_at_cost", "measure_latency",
           "patience_sweep", "threshold_sweep", "ECE_BINS", "calibration_metrics", "curve_calibration",
           "exit_calibration", "caching_anytime", "conditional_monotonicity", "ground_truth_probability",
           "product_anytime", "PREDICTORS", "predictor_of", "RC_POLICY", "RiskControl",
           "lambda_losses", "risk_controlled_thresholds", "select_lambda", "ExportedModel", "export_model",
           "manifest_sha256", "EvaluationReport", "THRESHOLDS_FILE", "evaluate"]
