"""MAR methods (``marbench.methods``): one module or subpackage per method."""
