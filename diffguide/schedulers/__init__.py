"""New schedulers following diffusers' ``SchedulerMixin`` / ``ConfigMixin`` contract."""

from .spd import ShortestPathScheduler, fit_spectrum_parameters, radial_power_spectrum

__all__ = ["ShortestPathScheduler", "fit_spectrum_parameters", "radial_power_spectrum"]
