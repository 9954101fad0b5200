"""deepunlearn: training-free class forgetting (Kodge, Saha, Roy, "Deep Unlearning", TMLR 2024).

Quick use::

    import deepunlearn
    report = deepunlearn.unlearn(model, forget_loader, retain_loader)  # alpha_r, alpha_f chosen
    print(report.alpha_choice, report)

See :func:`unlearn`, :func:`forget_classes`, :func:`search_alphas` and :func:`collect_statistics`.
"""
from .ops import extension_info
from .report import AlphaChoice
from .projection import Spectrum, scaled_projection
from .report import LayerReport, UnlearnReport
from .search import AlphaSearch, search_alphas
from .collect import collect_statistics
from .statistics import SlotStatistics, Statistics
from .api import forget_classes, unlearn
from .class_statistics import ClassStatistics

__version__ = "0.1.0"

__all__ = [
    "AlphaChoice",
    "AlphaSearch",
    "ClassStatistics",
    "LayerReport",
    "SlotStatistics",
    "Spectrum",
    "Statistics",
    "UnlearnReport",
    "collect_statistics",
    "extension_info",
    "forget_classes",
    "scaled_projection",
    "search_alphas",
    "unlearn",
]
