"""CROPI's selection inside other trainers: TRL's GRPOTrainer (:mod:`cropi.integrations.trl`)
and verl's curriculum sampler (:mod:`cropi.integrations.verl`). Each needs its extra
(README: "TRL" and "verl"); importing this package needs neither."""
