"""Expert placement: where each expert of each MoE layer lives on a set of devices.

`devices` (the device file and its checks), `presets` (named setups), `stats` (expert load
statistics, their JSON format, synthetic Zipf loads), `collect` (statistics of a graph on
calibration inputs), `cost` (the cost model), `baselines` (round-robin, EPLB), `search`
(the placement of one layer), `plan` (every layer, with the baselines' figures), `report`
(text and heatmap). The pass is `mocompile.passes.place`, the command `mocompile.place_cli`.
"""
