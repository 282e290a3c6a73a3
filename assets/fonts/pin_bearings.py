"""Makes plotters 0.3.7 space letters evenly with this font (run once; the result is committed).

plotters' ab_glyph text drawing puts each glyph's bounding box at the pen position, dropping the
glyph's left side bearing, so letters with a wide bearing sit too far left ("th e", "ne e dle").
This adds to every glyph whose outline starts right of its origin a one-point contour at
(0, yMin): it draws nothing, but the box then starts at the origin and plotters draws the bearing.
Advances, metrics and the visible outlines are unchanged.

    pip install fonttools && python3 pin_bearings.py DejaVuSans-subset.ttf   (edits it in place)
"""
import sys

from fontTools.ttLib import TTFont


def main(path: str) -> None:
    font = TTFont(path)
    glyf = font["glyf"]
    pinned = 0
    for name in font.getGlyphOrder():
        glyph = glyf[name]
        if glyph.isComposite() or glyph.numberOfContours <= 0:
            continue
        glyph.recalcBounds(glyf)
        if glyph.xMin <= 0:
            continue
        coords, ends, flags = glyph.getCoordinates(glyf)
        coords.append((0, glyph.yMin))
        flags.append(1)  # on-curve
        glyph.coordinates, glyph.flags = coords, flags
        glyph.endPtsOfContours = list(ends) + [len(coords) - 1]
        glyph.numberOfContours += 1
        pinned += 1
    font.save(path)
    print(f"{path}: pinned the left side bearing of {pinned} glyphs")


if __name__ == "__main__":
    main(sys.argv[1])
