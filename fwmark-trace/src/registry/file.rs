//! The registry file format (TOML, documented at the top of `registry/builtin.toml`) and the
//! `--owner NAME=MASK` quick form: parsed into `Owner`s, with errors that name the file, the
//! line and the reason.
use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use toml::Spanned;

use super::owner::{Field, Owner, Style};
use crate::mark::parse_u32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    profile: Option<Vec<String>>,
    #[serde(default)]
    owner: Vec<RawOwner>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOwner {
    name: Spanned<String>,
    version: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    source: String,
    style: Spanned<String>,
    mask: Spanned<String>,
    ct_mask: Option<Spanned<String>>,
    #[serde(default)]
    reads_exact: bool,
    #[serde(default)]
    values: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    chains: Vec<String>,
    #[serde(default)]
    fields: Vec<RawField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: String,
    mask: Spanned<String>,
    #[serde(default)]
    number: bool,
    #[serde(default)]
    values: BTreeMap<Spanned<String>, String>,
}

/// A file being parsed: turns byte spans into "file, line N: reason" errors.
struct SourceText<'a> {
    origin: &'a str,
    text: &'a str,
}

impl SourceText<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        // Bytes, not a `str` slice: a span inside a character cannot panic.
        let before = self.text.as_bytes().iter().take(span.start);
        before.filter(|&&b| b == b'\n').count() + 1
    }

    fn err(&self, span: std::ops::Range<usize>, reason: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "registry {}, line {}: {reason}",
            self.origin,
            self.line(span)
        )
    }

    fn number(&self, s: &Spanned<String>, what: &str) -> Result<u32> {
        parse_u32(s.get_ref()).ok_or_else(|| {
            self.err(
                s.span(),
                format!(
                    "{what} {:?} is not a 32-bit number (0x… or decimal)",
                    s.get_ref()
                ),
            )
        })
    }

    fn values(
        &self,
        raw: &BTreeMap<Spanned<String>, String>,
        within: u32,
        what: &str,
    ) -> Result<Vec<(u32, String)>> {
        raw.iter()
            .map(|(k, name)| {
                let v = self.number(k, "value")?;
                if v & !within != 0 {
                    return Err(self.err(
                        k.span(),
                        format!("value {v:#x} has bits outside {what} {within:#x}"),
                    ));
                }
                Ok((v, name.clone()))
            })
            .collect()
    }
}

/// Parses one registry file's text: its owners and its optional profile.
pub(crate) fn parse(text: &str, origin: &str) -> Result<(Vec<Owner>, Option<Vec<String>>)> {
    let src = SourceText { origin, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let reason = e.message().to_owned();
        match e.span() {
            Some(span) => src.err(span, reason),
            None => anyhow!("registry {origin}: {reason}"),
        }
    })?;
    let mut owners = Vec::new();
    for o in raw.owner {
        let name = o.name.get_ref();
        if !valid_name(name) {
            return Err(src.err(
                o.name.span(),
                format!("owner name {name:?} must be lowercase letters, digits and '-'"),
            ));
        }
        let style = match o.style.get_ref().as_str() {
            "bitwise" => Style::Bitwise,
            "whole-mark" => Style::WholeMark,
            other => {
                return Err(src.err(
                    o.style.span(),
                    format!("style {other:?} is neither \"bitwise\" nor \"whole-mark\""),
                ))
            }
        };
        let mask = src.number(&o.mask, "mask")?;
        let fields = o
            .fields
            .iter()
            .map(|f| {
                let fmask = src.number(&f.mask, "field mask")?;
                if fmask & !mask != 0 {
                    return Err(src.err(
                        f.mask.span(),
                        format!(
                            "field {} mask {fmask:#x} is outside the owner's mask {mask:#x}",
                            f.name
                        ),
                    ));
                }
                Ok(Field {
                    name: f.name.clone(),
                    mask: fmask,
                    number: f.number,
                    values: src.values(&f.values, fmask, "field mask")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Whole-mark owners name whole values; bitwise owners only values inside their bits.
        let within = if style == Style::Bitwise {
            mask
        } else {
            u32::MAX
        };
        let owner = Owner {
            name: name.clone(),
            version: o.version,
            aliases: o.aliases,
            description: o.description,
            source: o.source,
            style,
            mask,
            ct_mask: o
                .ct_mask
                .as_ref()
                .map(|m| src.number(m, "ct_mask"))
                .transpose()?,
            reads_exact: o.reads_exact,
            values: src.values(&o.values, within, "mask")?,
            chains: o.chains,
            fields,
            origin: origin.to_owned(),
        };
        if owners.iter().any(|x: &Owner| x.id() == owner.id()) {
            return Err(src.err(
                o.name.span(),
                format!("owner {} is defined twice in this file", owner.id()),
            ));
        }
        owners.push(owner);
    }
    Ok((owners, raw.profile))
}

/// An owner name: lowercase letters, digits and '-', not empty.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// `--owner NAME=MASK`: a quick bitwise owner.
pub(crate) fn parse_owner_flag(spec: &str) -> Result<Owner> {
    let (name, mask) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("--owner {spec:?}: expected NAME=MASK, e.g. myapp=0xf0000000"))?;
    let mask = parse_u32(mask)
        .ok_or_else(|| anyhow!("--owner {spec:?}: mask {mask:?} is not a 32-bit number"))?;
    if !valid_name(name) {
        bail!("--owner {spec:?}: name must be lowercase letters, digits and '-'");
    }
    Ok(Owner {
        name: name.to_owned(),
        version: None,
        aliases: vec![],
        description: "given with --owner".into(),
        source: "--owner".into(),
        style: Style::Bitwise,
        mask,
        ct_mask: None,
        reads_exact: false,
        values: vec![],
        chains: vec![],
        fields: vec![],
        origin: "--owner".into(),
    })
}
