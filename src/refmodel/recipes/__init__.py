"""Small, readable training loops on top of the library: the DPO loop (:mod:`.train`) and the demo."""
