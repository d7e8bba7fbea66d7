//! The generated `pitboss.v1` types (messages, the Bridge and Admin servers and
//! clients) and their descriptor set. A module of their own, below every layer: the
//! edge serves them and a `grpc` backend calls an upstream with them, and neither
//! should have to import the other to do so.

tonic::include_proto!("pitboss.v1");

/// The encoded descriptor set, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pitboss_descriptor.bin"));
