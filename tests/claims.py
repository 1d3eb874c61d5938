"""Hand-written Findings for derive tests: an exit layer the knockout claims and a curve that fades there."""


def findings_claiming(exit_layer: int, num_layers: int) -> dict:
    """Findings whose knockout says ``exit_layer`` and whose text->visual curve fades at it."""
    curve = [0.9 if layer < exit_layer else 0.0 for layer in range(num_layers)]
    return {"attnflow_findings": 1, "flow": {}, "thresholds": {}, "model": {}, "trace": {},
            "exit": {"applies": True, "layer": exit_layer, "criterion": "knockout",
                     "layers": {"knockout": {"layer": exit_layer, "tolerance": 0.01}},
                     "curves": {"observational": curve}},
            "redundancy": {"candidates": []}, "sinks": {"visual": []}}
