"""RTN: round every weight to the nearest point of its group's min-max grid, no calibration data."""

from epmq.grid import rtn_quantize
from epmq.quant.base import LayerResult, QuantMethod, register_method


@register_method("rtn")
class RTN(QuantMethod):
    label = "w/ RTN"
    needs_calibration = False
    collects_statistics = False

    def quantize(self, name, weight, stats):
        p = self.params
        return LayerResult(rtn_quantize(weight, p["bits"], p["group_size"], p["sym"]))

    def describe(self):
        return {key: self.params[key] for key in ("bits", "group_size", "sym")}
