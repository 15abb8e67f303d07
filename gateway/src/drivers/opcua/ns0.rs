//! The simulator's OPC-UA core namespace (ns=0), cut to what clients of a simulated machine use.
//!
//! async-opcua's own core node manager imports the whole standard namespace (thousands of nodes,
//! ~5.5 MB of generated code in the release binary, issue 13). A simulated press needs a small
//! part of it: the standard folders under `Root`, the `Server` object with its status, namespace
//! array and the capabilities the driver reads, and the type hierarchy that browsing with
//! "hierarchical references and subtypes" and a typed write check against. Values that change
//! (current time, state, namespace array, limits) are read live, the rest are static nodes; a
//! monitored item on one of them gets the value at its creation and no later samples, which is
//! what the clients of a simulator (the driver's limits, a browse, a status read) need.

use std::sync::Arc;

use async_trait::async_trait;
use opcua::sync::RwLock;
use opcua::types::{
    AttributeId, DataTypeId, DataValue, DateTime, IdType, Identifier, LocalizedText, NodeId, NumericRange, ObjectId,
    ObjectTypeId, ReferenceTypeId, TimestampsToReturn, VariableId, VariableTypeId, Variant,
};
use opcua_server::address_space::{
    read_node_value, AddressSpace, DataTypeBuilder, ObjectBuilder, ObjectTypeBuilder, ReferenceTypeBuilder,
    VariableBuilder, VariableTypeBuilder,
};
use opcua_server::diagnostics::NamespaceMetadata;
use opcua_server::node_manager::memory::{InMemoryNodeManagerImpl, InMemoryNodeManagerImplBuilder};
use opcua_server::node_manager::{NodeManagersRef, ParsedReadValueId, RequestContext, ServerContext};
use opcua_server::ServerStatusWrapper;

const UA_NAMESPACE: &str = "http://opcfoundation.org/UA/";

/// Builds [`Ns0`] into an in-memory node manager (`InMemoryNodeManagerBuilder::new(Ns0Builder)`).
pub struct Ns0Builder;

impl InMemoryNodeManagerImplBuilder for Ns0Builder {
    type Impl = Ns0;

    fn build(self, context: ServerContext, address_space: &mut AddressSpace) -> Ns0 {
        address_space.add_namespace(UA_NAMESPACE, 0);
        populate(address_space);
        Ns0 { node_managers: context.node_managers.clone(), status: context.status.clone() }
    }
}

/// The node manager of ns=0: static nodes from [`populate`], live values from [`Ns0::live`].
pub struct Ns0 {
    node_managers: NodeManagersRef,
    status: Arc<ServerStatusWrapper>,
}

#[async_trait]
impl InMemoryNodeManagerImpl for Ns0 {
    async fn init(&self, _address_space: &mut AddressSpace, _context: ServerContext) {}

    fn name(&self) -> &str {
        "core"
    }

    fn namespaces(&self) -> Vec<NamespaceMetadata> {
        vec![NamespaceMetadata {
            namespace_uri: UA_NAMESPACE.to_owned(),
            namespace_index: 0,
            is_namespace_subset: Some(true),
            static_node_id_types: Some(vec![IdType::Numeric]),
            ..Default::default()
        }]
    }

    async fn read_values(
        &self,
        context: &RequestContext,
        address_space: &RwLock<AddressSpace>,
        nodes: &[&ParsedReadValueId],
        max_age: f64,
        timestamps: TimestampsToReturn,
    ) -> Vec<DataValue> {
        let space = address_space.read();
        nodes
            .iter()
            .map(|n| match space.validate_node_read(context, n) {
                Err(e) => DataValue { status: Some(e), ..DataValue::null() },
                Ok(node) => match n.attribute_id {
                    AttributeId::Value => self
                        .live(context, &n.node_id)
                        .map(|v| ranged(v, &n.index_range))
                        .unwrap_or_else(|| read_node_value(node, context, n, max_age, timestamps)),
                    _ => read_node_value(node, context, n, max_age, timestamps),
                },
            })
            .collect()
    }
}

impl Ns0 {
    /// The value of a node whose value lives in the server rather than in the address space.
    fn live(&self, context: &RequestContext, id: &NodeId) -> Option<Variant> {
        if id.namespace != 0 {
            return None;
        }
        let Identifier::Numeric(n) = id.identifier else { return None };
        let id = VariableId::try_from(n).ok()?;
        let limits = &context.info.config.limits;
        Some(match id {
            VariableId::Server_ServerStatus => self.status.full_status_obj().into(),
            VariableId::Server_ServerStatus_State => (self.status.state() as i32).into(),
            VariableId::Server_ServerStatus_CurrentTime => DateTime::now().into(),
            VariableId::Server_ServerStatus_StartTime => self.status.start_time().into(),
            VariableId::Server_ServerStatus_BuildInfo_ProductName => self.status.build_info().product_name.into(),
            VariableId::Server_ServerStatus_BuildInfo_ProductUri => self.status.build_info().product_uri.into(),
            VariableId::Server_ServerStatus_BuildInfo_ManufacturerName => {
                self.status.build_info().manufacturer_name.into()
            }
            VariableId::Server_ServerStatus_BuildInfo_SoftwareVersion => {
                self.status.build_info().software_version.into()
            }
            VariableId::Server_ServerArray => context.info.servers.clone().into(),
            VariableId::Server_NamespaceArray => {
                // Every node manager says which namespaces it serves; holes stay empty strings so
                // that an index in the array is the namespace's index.
                let mut names: Vec<String> = Vec::new();
                for ns in self.node_managers.iter().flat_map(|m| m.namespaces_for_user(context)) {
                    let i = usize::from(ns.namespace_index);
                    if names.len() <= i {
                        names.resize(i + 1, String::new());
                    }
                    names[i] = ns.namespace_uri;
                }
                names.into()
            }
            VariableId::Server_ServiceLevel => {
                context.info.service_level.load(std::sync::atomic::Ordering::Relaxed).into()
            }
            VariableId::Server_ServerCapabilities_MinSupportedSampleRate => {
                (limits.subscriptions.min_sampling_interval_ms as u32 as f64).into()
            }
            VariableId::Server_ServerCapabilities_ServerProfileArray => {
                context.info.capabilities.profiles.clone().into()
            }
            VariableId::Server_ServerCapabilities_OperationLimits_MaxNodesPerRead => {
                (limits.operational.max_nodes_per_read as u32).into()
            }
            VariableId::Server_ServerCapabilities_OperationLimits_MaxNodesPerWrite => {
                (limits.operational.max_nodes_per_write as u32).into()
            }
            VariableId::Server_ServerCapabilities_OperationLimits_MaxNodesPerBrowse => {
                (limits.operational.max_nodes_per_browse as u32).into()
            }
            VariableId::Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall => {
                (limits.operational.max_monitored_items_per_call as u32).into()
            }
            _ => return None,
        })
    }
}

/// A live value cut to the client's index range, as the spec asks of every array read.
fn ranged(v: Variant, range: &NumericRange) -> DataValue {
    let v = if matches!(range, NumericRange::None) { Ok(v) } else { v.range_of(range) };
    match v {
        Ok(v) => DataValue::new_now(v),
        Err(e) => DataValue { status: Some(e), ..DataValue::null() },
    }
}

/// The standard folders, the `Server` object and the types, with the standard's node ids.
fn populate(space: &mut AddressSpace) {
    let folder = |space: &mut AddressSpace, id: ObjectId, name: &str, parent: Option<ObjectId>| {
        let b = ObjectBuilder::new(&id.into(), name, name).is_folder();
        match parent {
            Some(p) => b.organized_by(p),
            None => b,
        }
        .insert(space);
    };
    folder(space, ObjectId::RootFolder, "Root", None);
    folder(space, ObjectId::ObjectsFolder, "Objects", Some(ObjectId::RootFolder));
    folder(space, ObjectId::TypesFolder, "Types", Some(ObjectId::RootFolder));
    folder(space, ObjectId::ViewsFolder, "Views", Some(ObjectId::RootFolder));
    folder(space, ObjectId::ObjectTypesFolder, "ObjectTypes", Some(ObjectId::TypesFolder));
    folder(space, ObjectId::VariableTypesFolder, "VariableTypes", Some(ObjectId::TypesFolder));
    folder(space, ObjectId::DataTypesFolder, "DataTypes", Some(ObjectId::TypesFolder));
    folder(space, ObjectId::ReferenceTypesFolder, "ReferenceTypes", Some(ObjectId::TypesFolder));

    reference_types(space);
    types(space);
    server(space);
}

/// The reference types a browse filters on; `HierarchicalReferences` with subtypes must find
/// `Organizes` and `HasComponent`.
fn reference_types(space: &mut AddressSpace) {
    use ReferenceTypeId as R;
    // (id, name, inverse name, parent, symmetric, abstract)
    let all = [
        (R::References, "References", "", None, true, true),
        (
            R::HierarchicalReferences,
            "HierarchicalReferences",
            "InverseHierarchicalReferences",
            Some(R::References),
            false,
            true,
        ),
        (R::NonHierarchicalReferences, "NonHierarchicalReferences", "", Some(R::References), true, true),
        (R::HasChild, "HasChild", "ChildOf", Some(R::HierarchicalReferences), false, true),
        (R::Organizes, "Organizes", "OrganizedBy", Some(R::HierarchicalReferences), false, false),
        (R::HasEventSource, "HasEventSource", "EventSourceOf", Some(R::HierarchicalReferences), false, false),
        (R::HasNotifier, "HasNotifier", "NotifierOf", Some(R::HasEventSource), false, false),
        (R::Aggregates, "Aggregates", "AggregatedBy", Some(R::HasChild), false, true),
        (R::HasSubtype, "HasSubtype", "SubtypeOf", Some(R::HasChild), false, false),
        (R::HasComponent, "HasComponent", "ComponentOf", Some(R::Aggregates), false, false),
        (R::HasOrderedComponent, "HasOrderedComponent", "OrderedComponentOf", Some(R::HasComponent), false, false),
        (R::HasProperty, "HasProperty", "PropertyOf", Some(R::Aggregates), false, false),
        (
            R::HasTypeDefinition,
            "HasTypeDefinition",
            "TypeDefinitionOf",
            Some(R::NonHierarchicalReferences),
            false,
            false,
        ),
        (R::HasModellingRule, "HasModellingRule", "ModellingRuleOf", Some(R::NonHierarchicalReferences), false, false),
        (R::HasEncoding, "HasEncoding", "EncodingOf", Some(R::NonHierarchicalReferences), false, false),
        (R::GeneratesEvent, "GeneratesEvent", "GeneratedBy", Some(R::NonHierarchicalReferences), false, false),
    ];
    for (id, name, inverse, parent, symmetric, is_abstract) in all {
        let mut b = ReferenceTypeBuilder::new(&id.into(), name, name).symmetric(symmetric).is_abstract(is_abstract);
        if !inverse.is_empty() {
            b = b.inverse_name(LocalizedText::from(inverse));
        }
        match parent {
            Some(p) => b.subtype_of(p),
            None => b.organized_by(ObjectId::ReferenceTypesFolder),
        }
        .insert(space);
    }
}

/// The object, variable and data types the `Server` object and the simulator's variables name.
fn types(space: &mut AddressSpace) {
    use DataTypeId as D;
    use ObjectTypeId as O;
    use VariableTypeId as V;
    let objects = [
        (O::BaseObjectType, "BaseObjectType", None),
        (O::FolderType, "FolderType", Some(O::BaseObjectType)),
        (O::ServerType, "ServerType", Some(O::BaseObjectType)),
        (O::ServerCapabilitiesType, "ServerCapabilitiesType", Some(O::BaseObjectType)),
        (O::OperationLimitsType, "OperationLimitsType", Some(O::FolderType)),
    ];
    for (id, name, parent) in objects {
        let b = ObjectTypeBuilder::new(&id.into(), name, name).is_abstract(parent.is_none());
        match parent {
            Some(p) => b.subtype_of(p),
            None => b.organized_by(ObjectId::ObjectTypesFolder),
        }
        .insert(space);
    }
    let variables = [
        (V::BaseVariableType, "BaseVariableType", D::BaseDataType, None),
        (V::BaseDataVariableType, "BaseDataVariableType", D::BaseDataType, Some(V::BaseVariableType)),
        (V::PropertyType, "PropertyType", D::BaseDataType, Some(V::BaseVariableType)),
        (V::ServerStatusType, "ServerStatusType", D::ServerStatusDataType, Some(V::BaseDataVariableType)),
        (V::BuildInfoType, "BuildInfoType", D::BuildInfo, Some(V::BaseDataVariableType)),
    ];
    for (id, name, data_type, parent) in variables {
        let b = VariableTypeBuilder::new(&id.into(), name, name).data_type(data_type).is_abstract(parent.is_none());
        match parent {
            Some(p) => b.subtype_of(p),
            None => b.organized_by(ObjectId::VariableTypesFolder),
        }
        .insert(space);
    }
    // The built-in types, so that a write's value type is checked against the variable's type as
    // the standard's hierarchy says (an Int16 is an Integer is a Number).
    let data = [
        (D::BaseDataType, "BaseDataType", None),
        (D::Boolean, "Boolean", Some(D::BaseDataType)),
        (D::Number, "Number", Some(D::BaseDataType)),
        (D::Integer, "Integer", Some(D::Number)),
        (D::UInteger, "UInteger", Some(D::Number)),
        (D::SByte, "SByte", Some(D::Integer)),
        (D::Int16, "Int16", Some(D::Integer)),
        (D::Int32, "Int32", Some(D::Integer)),
        (D::Int64, "Int64", Some(D::Integer)),
        (D::Byte, "Byte", Some(D::UInteger)),
        (D::UInt16, "UInt16", Some(D::UInteger)),
        (D::UInt32, "UInt32", Some(D::UInteger)),
        (D::UInt64, "UInt64", Some(D::UInteger)),
        (D::Float, "Float", Some(D::Number)),
        (D::Double, "Double", Some(D::Number)),
        (D::Duration, "Duration", Some(D::Double)),
        (D::String, "String", Some(D::BaseDataType)),
        (D::LocaleId, "LocaleId", Some(D::String)),
        (D::DateTime, "DateTime", Some(D::BaseDataType)),
        (D::UtcTime, "UtcTime", Some(D::DateTime)),
        (D::Guid, "Guid", Some(D::BaseDataType)),
        (D::ByteString, "ByteString", Some(D::BaseDataType)),
        (D::XmlElement, "XmlElement", Some(D::BaseDataType)),
        (D::NodeId, "NodeId", Some(D::BaseDataType)),
        (D::ExpandedNodeId, "ExpandedNodeId", Some(D::BaseDataType)),
        (D::StatusCode, "StatusCode", Some(D::BaseDataType)),
        (D::QualifiedName, "QualifiedName", Some(D::BaseDataType)),
        (D::LocalizedText, "LocalizedText", Some(D::BaseDataType)),
        (D::DataValue, "DataValue", Some(D::BaseDataType)),
        (D::DiagnosticInfo, "DiagnosticInfo", Some(D::BaseDataType)),
        (D::Structure, "Structure", Some(D::BaseDataType)),
        (D::Enumeration, "Enumeration", Some(D::BaseDataType)),
        (D::ServerState, "ServerState", Some(D::Enumeration)),
        (D::ServerStatusDataType, "ServerStatusDataType", Some(D::Structure)),
        (D::BuildInfo, "BuildInfo", Some(D::Structure)),
    ];
    for (id, name, parent) in data {
        let abstract_ =
            matches!(id, D::BaseDataType | D::Number | D::Integer | D::UInteger | D::Structure | D::Enumeration);
        let b = DataTypeBuilder::new(&id.into(), name, name).is_abstract(abstract_);
        match parent {
            Some(p) => b.subtype_of(p),
            None => b.organized_by(ObjectId::DataTypesFolder),
        }
        .insert(space);
    }
}

/// `Objects/Server`: status, namespace and server arrays, service level and the capabilities.
fn server(space: &mut AddressSpace) {
    use DataTypeId as D;
    use VariableId as Var;
    ObjectBuilder::new(&ObjectId::Server.into(), "Server", "Server")
        .has_type_definition(ObjectTypeId::ServerType)
        .organized_by(ObjectId::ObjectsFolder)
        .insert(space);
    ObjectBuilder::new(&ObjectId::Server_ServerCapabilities.into(), "ServerCapabilities", "ServerCapabilities")
        .has_type_definition(ObjectTypeId::ServerCapabilitiesType)
        .component_of(ObjectId::Server)
        .insert(space);
    ObjectBuilder::new(
        &ObjectId::Server_ServerCapabilities_OperationLimits.into(),
        "OperationLimits",
        "OperationLimits",
    )
    .has_type_definition(ObjectTypeId::OperationLimitsType)
    .component_of(ObjectId::Server_ServerCapabilities)
    .insert(space);

    let parent_status: NodeId = Var::Server_ServerStatus.into();
    let parent_build: NodeId = Var::Server_ServerStatus_BuildInfo.into();
    let server: NodeId = ObjectId::Server.into();
    let caps: NodeId = ObjectId::Server_ServerCapabilities.into();
    let limits: NodeId = ObjectId::Server_ServerCapabilities_OperationLimits.into();
    // (id, name, data type, value rank, parent, property?, variable type)
    let vars = [
        (Var::Server_ServerArray, "ServerArray", D::String, 1, &server, true, VariableTypeId::PropertyType),
        (Var::Server_NamespaceArray, "NamespaceArray", D::String, 1, &server, true, VariableTypeId::PropertyType),
        (Var::Server_ServiceLevel, "ServiceLevel", D::Byte, -1, &server, true, VariableTypeId::PropertyType),
        (
            Var::Server_ServerStatus,
            "ServerStatus",
            D::ServerStatusDataType,
            -1,
            &server,
            false,
            VariableTypeId::ServerStatusType,
        ),
        (
            Var::Server_ServerStatus_StartTime,
            "StartTime",
            D::UtcTime,
            -1,
            &parent_status,
            false,
            VariableTypeId::BaseDataVariableType,
        ),
        (
            Var::Server_ServerStatus_CurrentTime,
            "CurrentTime",
            D::UtcTime,
            -1,
            &parent_status,
            false,
            VariableTypeId::BaseDataVariableType,
        ),
        (
            Var::Server_ServerStatus_State,
            "State",
            D::ServerState,
            -1,
            &parent_status,
            false,
            VariableTypeId::BaseDataVariableType,
        ),
        (
            Var::Server_ServerStatus_BuildInfo,
            "BuildInfo",
            D::BuildInfo,
            -1,
            &parent_status,
            false,
            VariableTypeId::BuildInfoType,
        ),
        (
            Var::Server_ServerStatus_BuildInfo_ProductUri,
            "ProductUri",
            D::String,
            -1,
            &parent_build,
            false,
            VariableTypeId::BaseDataVariableType,
        ),
        (
            Var::Server_ServerStatus_BuildInfo_ManufacturerName,
            "ManufacturerName",
            D::String,
            -1,
            &parent_build,
            false,
            VariableTypeId::BaseDataVariableType,
        ),
        (
            Var::Server_ServerStatus_BuildInfo_ProductName,
            "ProductName",
            D::String,
            -1,
            &parent_build,
            false,
            VariableTypeId::BaseDataVariableType,
        ),
        (
            Var::Server_ServerStatus_BuildInfo_SoftwareVersion,
            "SoftwareVersion",
            D::String,
            -1,
            &parent_build,
            false,
            VariableTypeId::BaseDataVariableType,
        ),
        (
            Var::Server_ServerCapabilities_MinSupportedSampleRate,
            "MinSupportedSampleRate",
            D::Duration,
            -1,
            &caps,
            true,
            VariableTypeId::PropertyType,
        ),
        (
            Var::Server_ServerCapabilities_ServerProfileArray,
            "ServerProfileArray",
            D::String,
            1,
            &caps,
            true,
            VariableTypeId::PropertyType,
        ),
        (
            Var::Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            "MaxNodesPerRead",
            D::UInt32,
            -1,
            &limits,
            true,
            VariableTypeId::PropertyType,
        ),
        (
            Var::Server_ServerCapabilities_OperationLimits_MaxNodesPerWrite,
            "MaxNodesPerWrite",
            D::UInt32,
            -1,
            &limits,
            true,
            VariableTypeId::PropertyType,
        ),
        (
            Var::Server_ServerCapabilities_OperationLimits_MaxNodesPerBrowse,
            "MaxNodesPerBrowse",
            D::UInt32,
            -1,
            &limits,
            true,
            VariableTypeId::PropertyType,
        ),
        (
            Var::Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
            "MaxMonitoredItemsPerCall",
            D::UInt32,
            -1,
            &limits,
            true,
            VariableTypeId::PropertyType,
        ),
    ];
    for (id, name, data_type, rank, parent, property, type_def) in vars {
        let b = VariableBuilder::new(&id.into(), name, name)
            .data_type(data_type)
            .value_rank(rank)
            .has_type_definition(type_def);
        if property { b.property_of(parent.clone()) } else { b.component_of(parent.clone()) }.insert(space);
    }
}
