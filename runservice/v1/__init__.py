"""Generated from protos/runservice/v1 by `make proto`; do not edit."""
