//! `updraft opcua browse`: the server's address space as a tree (NodeIds, data types, access
//! levels), or with `--toml` as tag lines to paste into a device. Ops teams find NodeIds this way.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use opcua::client::{ClientBuilder, IdentityToken, Session};
use opcua::types::{
    AttributeId, BrowseDescription, BrowseDirection, BrowseResultMask, ByteString, MessageSecurityMode, NodeClass,
    NodeId, ObjectId, ReadValueId, ReferenceDescription, ReferenceTypeId, TimestampsToReturn, UserTokenPolicy, Variant,
};

use super::config::parse_node;
use crate::config::validate::name_problem;

pub struct Options {
    pub endpoint: String,
    /// Where to start; default the Objects folder.
    pub node: Option<String>,
    pub depth: u32,
    pub toml: bool,
    /// The certificate folders to use (a temporary one unless a config names its data_dir).
    pub pki: PathBuf,
    pub timeout: Duration,
}

/// One node found.
struct Found {
    depth: u32,
    reference: ReferenceDescription,
    data_type: Option<String>,
    writable: bool,
}

/// Browses and renders the result.
pub async fn run(opts: &Options) -> Result<String, String> {
    let start = match &opts.node {
        Some(n) => parse_node(n)?,
        None => ObjectId::ObjectsFolder.into(),
    };
    let mut client = ClientBuilder::new()
        .application_name("Updraft browse")
        .application_uri("urn:updraft:browse")
        .product_uri("urn:updraft")
        .pki_dir(opts.pki.clone())
        .create_sample_keypair(true)
        .session_retry_limit(0)
        .request_timeout(opts.timeout)
        .client()
        .map_err(|e| e.join("; "))?;
    let endpoint = (
        opts.endpoint.as_str(),
        opcua::crypto::SecurityPolicy::None.to_uri(),
        MessageSecurityMode::None,
        UserTokenPolicy::anonymous(),
    );
    let connect = client.connect_to_matching_endpoint(endpoint, IdentityToken::Anonymous);
    let (session, event_loop) = tokio::time::timeout(opts.timeout, connect)
        .await
        .map_err(|_| format!("{}: no answer within {:?}", opts.endpoint, opts.timeout))?
        .map_err(|e| format!("{}: {e}", opts.endpoint))?;
    let pump = event_loop.spawn();
    if !tokio::time::timeout(opts.timeout, session.wait_for_connection()).await.unwrap_or(false) {
        pump.abort();
        return Err(format!("{}: could not open a session", opts.endpoint));
    }
    let result = walk(&session, start, opts.depth).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), session.disconnect()).await;
    pump.abort();
    let found = result?;
    Ok(if opts.toml { render_toml(&found) } else { render_tree(&found) })
}

/// Depth-first over hierarchical references, `depth` levels below `start`, each node once, in
/// the order a tree prints.
async fn walk(session: &Session, start: NodeId, depth: u32) -> Result<Vec<Found>, String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    seen.insert(start.clone());
    let mut stack = level(session, &start, 0, &mut seen).await?;
    stack.reverse();
    while let Some(f) = stack.pop() {
        let expand = f.depth + 1 < depth;
        let (id, d) = (f.reference.node_id.node_id.clone(), f.depth);
        out.push(f);
        if expand {
            let mut kids = level(session, &id, d + 1, &mut seen).await?;
            kids.reverse();
            stack.extend(kids);
        }
    }
    Ok(out)
}

/// The described children of one node not seen before.
async fn level(session: &Session, node: &NodeId, depth: u32, seen: &mut HashSet<NodeId>) -> Result<Vec<Found>, String> {
    let mut batch: Vec<Found> = children(session, node)
        .await?
        .into_iter()
        .filter(|r| seen.insert(r.node_id.node_id.clone()))
        .map(|reference| Found { depth, reference, data_type: None, writable: false })
        .collect();
    describe_variables(session, &mut batch).await;
    Ok(batch)
}

async fn children(session: &Session, node: &NodeId) -> Result<Vec<ReferenceDescription>, String> {
    let desc = BrowseDescription {
        node_id: node.clone(),
        browse_direction: BrowseDirection::Forward,
        reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
        include_subtypes: true,
        node_class_mask: (NodeClass::Object as u32) | (NodeClass::Variable as u32),
        result_mask: BrowseResultMask::All as u32,
    };
    let mut results = session.browse(&[desc], 0, None).await.map_err(|e| format!("browse {node}: {e}"))?;
    let mut refs = Vec::new();
    let mut result = results.pop();
    while let Some(r) = result.take() {
        if r.status_code.is_bad() {
            return Err(format!("browse {node}: {}", r.status_code));
        }
        refs.extend(r.references.unwrap_or_default());
        let cp: ByteString = r.continuation_point;
        if !cp.is_null() && !cp.is_empty() {
            result = session.browse_next(false, &[cp]).await.map_err(|e| format!("browse {node}: {e}"))?.pop();
        }
    }
    Ok(refs)
}

/// Reads the data type and access level of the variables in `batch`.
async fn describe_variables(session: &Session, batch: &mut [Found]) {
    let vars: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].reference.node_class == NodeClass::Variable).collect();
    if vars.is_empty() {
        return;
    }
    let mut reads = Vec::new();
    for &i in &vars {
        let id = batch[i].reference.node_id.node_id.clone();
        reads.push(ReadValueId { attribute_id: AttributeId::DataType as u32, ..ReadValueId::from(id.clone()) });
        reads.push(ReadValueId { attribute_id: AttributeId::UserAccessLevel as u32, ..ReadValueId::from(id) });
    }
    let Ok(values) = session.read(&reads, TimestampsToReturn::Neither, 0.0).await else { return };
    for (k, &i) in vars.iter().enumerate() {
        if let Some(Variant::NodeId(t)) = values.get(2 * k).and_then(|v| v.value.as_ref()) {
            batch[i].data_type = Some(type_name(t));
        }
        if let Some(Variant::Byte(level)) = values.get(2 * k + 1).and_then(|v| v.value.as_ref()) {
            // Bit 1 is CurrentWrite.
            batch[i].writable = level & 0x02 != 0;
        }
    }
}

fn type_name(t: &NodeId) -> String {
    match t.as_data_type_id() {
        Ok(id) => format!("{id:?}"),
        Err(_) => t.to_string(),
    }
}

fn render_tree(found: &[Found]) -> String {
    let mut out = String::new();
    for f in found {
        let indent = "  ".repeat(f.depth as usize);
        let r = &f.reference;
        let _ = write!(out, "{indent}{}  {}", r.display_name.text, r.node_id.node_id);
        if r.node_class == NodeClass::Variable {
            let access = if f.writable { "rw" } else { "ro" };
            let _ = write!(out, "  {} {access}", f.data_type.as_deref().unwrap_or("?"));
        }
        out.push('\n');
    }
    if out.is_empty() {
        out.push_str("(no objects or variables below this node)\n");
    }
    out
}

fn render_toml(found: &[Found]) -> String {
    let mut out = String::from("tags = [\n");
    let mut names = HashSet::new();
    for f in found.iter().filter(|f| f.reference.node_class == NodeClass::Variable) {
        let name = unique(tag_name(f.reference.browse_name.name.as_ref()), &mut names);
        let node = f.reference.node_id.node_id.to_string();
        let access = if f.writable { ", access = \"rw\"" } else { "" };
        let _ = writeln!(
            out,
            "  {{ name = {}, node = {}{access} }},  # {}",
            toml_string(&name),
            toml_string(&node),
            f.data_type.as_deref().unwrap_or("?")
        );
    }
    out.push_str("]\n");
    out
}

/// A browse name as a tag name: characters a topic cannot carry become `_`.
fn tag_name(browse: &str) -> String {
    let mut s: String = browse
        .chars()
        .map(|c| if matches!(c, '/' | '+' | '#') || c.is_whitespace() || c.is_control() { '_' } else { c })
        .collect();
    while s.contains("..") {
        s = s.replace("..", "_");
    }
    s.truncate(100);
    if name_problem(&s).is_some() {
        s = "tag".into();
    }
    s
}

fn unique(name: String, seen: &mut HashSet<String>) -> String {
    if seen.insert(name.clone()) {
        return name;
    }
    (2..).map(|n| format!("{name}_{n}")).find(|n| seen.insert(n.clone())).unwrap_or(name)
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browse_names_become_valid_unique_tag_names() {
        let mut seen = HashSet::new();
        assert_eq!(unique(tag_name("Speed"), &mut seen), "Speed");
        assert_eq!(unique(tag_name("Speed"), &mut seen), "Speed_2");
        assert_eq!(tag_name("Motor 1/Temp"), "Motor_1_Temp");
        assert_eq!(tag_name(".."), "_");
        assert!(name_problem(&tag_name(&"x".repeat(300))).is_none());
    }
}
