//! Topic names and templates.
//!
//! A template (`parks/{gateway}/{device}`, `updraft/derived/{device}/{tag}`) is parsed once, when
//! the config is loaded, into literal text and placeholders; rendering it is a walk over the parts,
//! with no search and replace per point.

/// Topic prefix of every device reading on the local bus.
pub const TOPIC_PREFIX: &str = "updraft";

/// A placeholder of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    Gateway,
    Device,
    Tag,
    /// The point's topic on the local broker.
    Topic,
    /// The plugin's name.
    Plugin,
    /// A plugin message's subject.
    Subject,
}

impl Var {
    fn name(self) -> &'static str {
        match self {
            Var::Gateway => "gateway",
            Var::Device => "device",
            Var::Tag => "tag",
            Var::Topic => "topic",
            Var::Plugin => "plugin",
            Var::Subject => "subject",
        }
    }

    fn parse(s: &str) -> Option<Var> {
        [Var::Gateway, Var::Device, Var::Tag, Var::Topic, Var::Plugin, Var::Subject].into_iter().find(|v| v.name() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

/// A parsed topic (or URL) template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// The values a template is rendered with; an absent one renders as empty text.
#[derive(Debug, Default, Clone, Copy)]
pub struct Vars<'a> {
    pub gateway: &'a str,
    pub device: &'a str,
    pub tag: &'a str,
    pub topic: &'a str,
    pub plugin: &'a str,
    pub subject: &'a str,
}

impl Template {
    /// Parses a template; `allowed` are the placeholders this use of it knows. An unknown or
    /// unclosed placeholder is an error that names it and the allowed ones.
    pub fn parse(source: &str, allowed: &[Var]) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("template `{source}` has a `{{` without its `}}`"));
            };
            let name = &rest[open + 1..open + close];
            match Var::parse(name).filter(|v| allowed.contains(v)) {
                Some(v) => parts.push(Part::Var(v)),
                None => {
                    let names: Vec<String> = allowed.iter().map(|v| format!("{{{}}}", v.name())).collect();
                    return Err(format!(
                        "template `{source}` has an unknown placeholder `{{{name}}}`; use {}",
                        names.join(", ")
                    ));
                }
            }
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template { source: source.to_owned(), parts })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template uses `var`.
    pub fn uses(&self, var: Var) -> bool {
        self.parts.contains(&Part::Var(var))
    }

    /// The template with the given values filled in.
    pub fn render(&self, vars: &Vars<'_>) -> String {
        let mut out = String::with_capacity(self.source.len() + 32);
        for p in &self.parts {
            out.push_str(match p {
                Part::Text(t) => t,
                Part::Var(Var::Gateway) => vars.gateway,
                Part::Var(Var::Device) => vars.device,
                Part::Var(Var::Tag) => vars.tag,
                Part::Var(Var::Topic) => vars.topic,
                Part::Var(Var::Plugin) => vars.plugin,
                Part::Var(Var::Subject) => vars.subject,
            });
        }
        out
    }

    /// The template with only `{gateway}` filled in, the rest left as written.
    pub fn with_gateway(&self, gateway: &str) -> String {
        self.source.replace("{gateway}", gateway)
    }
}

/// Every placeholder; which ones a use allows is checked where the config is validated.
pub const ALL: &[Var] = &[Var::Gateway, Var::Device, Var::Tag, Var::Topic, Var::Plugin, Var::Subject];

impl Template {
    /// The placeholders used that are not in `allowed`, as `{name}` strings.
    pub fn unsupported(&self, allowed: &[Var]) -> Vec<String> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Var(v) if !allowed.contains(v) => Some(format!("{{{}}}", v.name())),
                _ => None,
            })
            .collect()
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

impl<'de> serde::Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Template::parse(&s, ALL).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_refuse_unknown_placeholders() {
        let t = Template::parse("parks/{gateway}/{device}/x", &[Var::Gateway, Var::Device, Var::Tag]).unwrap();
        let v = Vars { gateway: "gw", device: "press", ..Vars::default() };
        assert_eq!(t.render(&v), "parks/gw/press/x");
        assert!(t.uses(Var::Device) && !t.uses(Var::Tag));
        let e = Template::parse("a/{devcie}", &[Var::Device]).unwrap_err();
        assert!(e.contains("unknown placeholder `{devcie}`") && e.contains("{device}"), "{e}");
        assert!(Template::parse("a/{device", &[Var::Device]).is_err());
        assert!(Template::parse("a/{plugin}", &[Var::Device]).is_err(), "not allowed here");
        assert_eq!(Template::parse("plain", &[]).unwrap().render(&v), "plain");
    }
}
