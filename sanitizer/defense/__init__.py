"""The default defense (`--criterion probe`): find the class a backdoor sends images to, then bound, prune
and repair the model until probes toward that class fail, every decision judged on held-out images.

The steps, in order, one module each (pipeline.sanitize runs detect, then defend.defend the rest):

1. detect (detect.py): which class, if any, is a backdoor's target. A short patch scan toward any class,
   then toward the few classes it reaches most (K-Arm's pre-selection of target arms, Shen et al. 2021),
   at 15 % of the image side and, when that finds nothing, at 20 %; unless the smaller patch found one, the
   same scan with a signal (SIG) and a smooth warp (WaNet) probe (of two targets, the finding further past
   its bar); when none does, the Neural-Cleanse mask search and its MAD anomaly index (Wang et al. 2019).
2. probes (probes.py): universal patches at the corners and the centre and a faint full-image perturbation
   (and the probe family that found the target), each optimised to send clean images to the target: what a
   trigger would do, found without one.
3. bound (bound.py; the graph rewrite is rewrite.apply_bounds): cap every unit at a quantile of its clean
   per-image ℓ∞ (activation clipping, Wang, Xiang, Miller, Kesidis, MLSP 2024).
4. rank (rank.py): units ordered by the probes' ℓ∞ rise over clean images (the signature of Cheng et al.,
   "Defending against Backdoor Attack on Deep Neural Networks"), in two normalisations, and by the
   gradient of the probes' target margin through a mask on each unit (margin attribution).
5. count (count.py): how many top units to prune, the smallest count at which every probe that pruning
   can silence is at the attack-success goal on the held-out images.
6. repair (repair.py): short distillation from the original's own predictions with the pruned units
   masked, each probed image held to the prediction on its clean twin, the gradient clipped.
7. re-attack (reattack.py): fresh probes against the result, and a sparse probe (free pixels anywhere, a
   Neural-Cleanse mask cut to a pixel count) for a trigger spread beyond the places probed; where one still
   works, the target is judged against the best other class the same probe reaches at the same place
   (Neural Cleanse's comparison with the other classes).
8. unlearning round (defend.py): when every candidate fails the re-attack, the fresh probes that reached the
   preferred one join the probes, the long repair runs again from the pruned model, and the re-attack
   judges that (adversarial unlearning, as I-BAU, Zeng et al. ICLR 2022, restricted to one round).

context.py holds Context, what every step needs (the Effort among it: effort.py sizes each search's images and
steps to the run's time budget); torchnet.py the torch side (device, the ONNX model as a
torch classifier, raw pixels to model input). torch is imported only when a step that needs it runs.
"""
from .context import Context
from .defend import defend

__all__ = ["Context", "defend"]
