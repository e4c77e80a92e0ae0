"""One dark theme for widgets and plots, so the window reads the same everywhere (and in screenshots)."""
from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtGui import QColor, QFont, QPalette
from PySide6.QtWidgets import QApplication

BG = "#1e2024"
BG_ALT = "#25282d"
PANEL = "#2b2f35"
PLOT_BG = "#17191c"
LEGEND_BG = (23, 25, 28, 200)
FG = "#d4d7dc"
FG_DIM = "#8b9199"
ACCENT = "#4f9dff"
ERROR = "#ff5d6c"
OK = "#4fd1a5"
WARN = "#ffb454"

CURVES = {
    "loss": "#4f9dff", "loss_batch": "#ffb454", "loss_memory": "#ff6b81",
    "memory_fill": "#4fd1a5",
    "drift": "#c792ea", "drift_age": "#7fdbca",
    "val": "#ffd866", "test": "#ff6188",
    "images_per_s": "#78dce8",
    "pos_pairs": "#a9dc76", "neg_pairs": "#fc9867",
}
# Phase colours: markers in the plots and the badge in the header.
PHASES = {"warmup": "#b7791f", "memory_init": "#2b8a9e", "xbm": "#2f9e6e", "baseline": "#6b7280",
          "evaluate": "#8b5cf6"}
# Distinct colours for overlaid runs.
OVERLAY = ("#4f9dff", "#ffb454", "#4fd1a5", "#ff6b81", "#c792ea", "#78dce8", "#ffd866", "#a9dc76",
           "#fc9867", "#f78c6c")

STYLESHEET = f"""
QWidget {{ font-size: 10pt; }}
QToolTip {{ color: {FG}; background: {PANEL}; border: 1px solid #3a3f47; }}
QLabel#phaseBadge {{ color: white; font-weight: bold; padding: 2px 10px; border-radius: 9px;
                     background: {FG_DIM}; }}
QLabel#statLabel {{ color: {FG}; padding: 0 8px; }}
QLabel#dimLabel {{ color: {FG_DIM}; }}
QLabel[error="true"], QLabel#dimLabel[error="true"] {{ color: {ERROR}; }}
QLabel#fieldError, QLabel#formError {{ color: {ERROR}; font-size: 9pt; }}
QLabel#commandPreview {{ color: {FG}; background: {PLOT_BG}; padding: 4px; border-radius: 3px;
                         font-family: "DejaVu Sans Mono", monospace; font-size: 9pt; }}
QLineEdit[invalid="true"], QComboBox[invalid="true"] {{ border: 1px solid {ERROR}; border-radius: 2px; }}
QFrame#errorBanner {{ background: #4a1f25; border: 1px solid {ERROR}; border-radius: 4px; }}
QFrame#errorBanner QLabel {{ color: #ffd9dd; }}
QPushButton#runButton {{ background: #2f6fd0; color: white; font-weight: bold; padding: 5px; border-radius: 3px; }}
QPushButton#runButton:disabled {{ background: #39404a; color: {FG_DIM}; }}
QPushButton#stopButton:enabled {{ background: #9e2f3c; color: white; font-weight: bold; padding: 5px;
                                  border-radius: 3px; }}
QPlainTextEdit#logView {{ font-family: "DejaVu Sans Mono", monospace; font-size: 9pt; background: {PLOT_BG}; }}
QDockWidget::title {{ padding: 4px; background: {BG_ALT}; }}
"""


def apply(app: QApplication) -> None:
    app.setStyle("Fusion")
    pal = QPalette()
    for role, color in (
        (QPalette.ColorRole.Window, BG), (QPalette.ColorRole.WindowText, FG), (QPalette.ColorRole.Base, BG_ALT),
        (QPalette.ColorRole.AlternateBase, PANEL), (QPalette.ColorRole.Text, FG),
        (QPalette.ColorRole.Button, PANEL), (QPalette.ColorRole.ButtonText, FG),
        (QPalette.ColorRole.Highlight, ACCENT), (QPalette.ColorRole.HighlightedText, "#ffffff"),
        (QPalette.ColorRole.ToolTipBase, PANEL), (QPalette.ColorRole.ToolTipText, FG),
        (QPalette.ColorRole.PlaceholderText, FG_DIM), (QPalette.ColorRole.Link, ACCENT),
    ):
        pal.setColor(role, QColor(color))
    for role in (QPalette.ColorRole.WindowText, QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText):
        pal.setColor(QPalette.ColorGroup.Disabled, role, QColor(FG_DIM))
    app.setPalette(pal)
    font = QFont("DejaVu Sans")
    font.setPointSize(10)
    app.setFont(font)
    app.setStyleSheet(STYLESHEET)
    pg.setConfigOptions(antialias=True, background=PLOT_BG, foreground=FG)
