//! The gRPC server stubs of the CSI node plugin: the CSI spec's Identity and Node services
//! and the kubelet's plugin Registration, written out from the method lists below (no
//! .proto files, no protoc). The messages are `src/csi/messages.rs`.

use tonic_build::manual::{Builder, Method, Service};

fn service(package: &str, name: &str, methods: &[(&str, &str, &str, &str)]) -> Service {
    methods
        .iter()
        .fold(
            Service::builder().name(name).package(package),
            |service, (method, route, input, output)| {
                service.method(
                    Method::builder()
                        .name(method)
                        .route_name(route)
                        .input_type(format!("crate::csi::messages::{input}"))
                        .output_type(format!("crate::csi::messages::{output}"))
                        .codec_path("tonic_prost::ProstCodec")
                        .build(),
                )
            },
        )
        .build()
}

fn main() {
    let identity = service(
        "csi.v1",
        "Identity",
        &[
            (
                "get_plugin_info",
                "GetPluginInfo",
                "GetPluginInfoRequest",
                "GetPluginInfoResponse",
            ),
            (
                "get_plugin_capabilities",
                "GetPluginCapabilities",
                "GetPluginCapabilitiesRequest",
                "GetPluginCapabilitiesResponse",
            ),
            ("probe", "Probe", "ProbeRequest", "ProbeResponse"),
        ],
    );
    let node = service(
        "csi.v1",
        "Node",
        &[
            (
                "node_publish_volume",
                "NodePublishVolume",
                "NodePublishVolumeRequest",
                "NodePublishVolumeResponse",
            ),
            (
                "node_unpublish_volume",
                "NodeUnpublishVolume",
                "NodeUnpublishVolumeRequest",
                "NodeUnpublishVolumeResponse",
            ),
            (
                "node_get_capabilities",
                "NodeGetCapabilities",
                "NodeGetCapabilitiesRequest",
                "NodeGetCapabilitiesResponse",
            ),
            (
                "node_get_info",
                "NodeGetInfo",
                "NodeGetInfoRequest",
                "NodeGetInfoResponse",
            ),
        ],
    );
    let registration = service(
        "pluginregistration",
        "Registration",
        &[
            ("get_info", "GetInfo", "InfoRequest", "PluginInfo"),
            (
                "notify_registration_status",
                "NotifyRegistrationStatus",
                "RegistrationStatus",
                "RegistrationStatusResponse",
            ),
        ],
    );
    Builder::new()
        .build_client(false)
        .build_transport(false)
        .compile(&[identity, node, registration]);
}
