"""The drift plot's title carries its legend; at 1,600 px it wraps instead of being cut off: every key,
"D(t; 1000)" included, lies within the plot's column, and the title's box is tall enough for all its lines."""
from PySide6.QtCore import Qt
from PySide6.QtGui import QFontMetricsF

from gui import theme
from gui.monitor import MonitorPanel, make_curve


def test_the_drift_legend_fits_at_1600_px(qtbot):
    panel = MonitorPanel()
    qtbot.addWidget(panel)
    panel.resize(1600, 1000)
    panel.show()
    d = panel.drift
    for i, dt in enumerate((10, 100, 1000)):
        colour = theme.OVERLAY[i + 2]
        d.add(f"drift/D_{dt}", make_curve(f"D(t; {dt})", colour, 2.0, symbol="o"))
        d.add(f"drift/backbone_{dt}", make_curve(f"backbone D(t; {dt})", colour, 1.5, style=Qt.PenStyle.DashLine))
    d.add("active_neg_age", make_curve("active negatives' age", theme.CURVES["drift_age"], 2.0, symbol="t"),
          right=True)
    d.set_title("Embedding drift · directed ×3.4 · grad from entries ≥100 steps old 42%")
    label = d.item.titleLabel

    def fits() -> bool:
        doc = label.item.document()
        return (label.rect().width() > 0 and doc.idealWidth() <= label.rect().width() + 1
                and label.itemRect().height() <= label.rect().height() + 1)

    qtbot.waitUntil(fits, timeout=5_000)
    text = label.item.document().toPlainText().replace("\\xa0", " ")
    assert "D(t; 1000)" in text and "backbone D(t; 1000)" in text and "active negatives' age" in text
    # every line of the laid-out text, measured with the label's font, is within the plot's column
    column = d.item.width()
    assert label.rect().width() <= column + 1
    layout = label.item.document().documentLayout()
    assert layout.documentSize().width() <= column + 1
    block = label.item.document().begin()
    lines = 0
    while block.isValid():
        lay = block.layout()
        for i in range(lay.lineCount()):
            line = lay.lineAt(i)
            assert line.naturalTextWidth() <= label.rect().width() + 1
            lines += 1
        block = block.next()
    assert lines >= 2  # it wrapped: one line would be wider than the column
    fm = QFontMetricsF(label.item.font())
    assert fm.horizontalAdvance("D(t; 1000)") < label.rect().width()
