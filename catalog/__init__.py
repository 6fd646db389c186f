"""Generated gRPC/protobuf stubs of the catalog API (make proto); do not edit."""
