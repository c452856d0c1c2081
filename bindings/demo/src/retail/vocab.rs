//! Word lists and per-category tables that drive the retail data set generator.
//!
//! Everything here is static data. The generator draws from these tables with a seeded RNG, and
//! the verifier parses question text back with the same tables, so a change here changes both
//! sides at once.

/// One free attribute a category's products may carry.
pub(crate) struct AttrSpec {
    /// Key in `Product::attributes`.
    pub key: &'static str,
    /// How values are drawn, stored and compared.
    pub kind: AttrKind,
    /// Share of the category's products that carry the attribute.
    pub presence: f64,
    /// Single-hop question template; `{name}` stands for the product name.
    pub question: &'static str,
    /// Multi-hop constraint phrase; `{}` stands for the value. `None` keeps the attribute out of
    /// multi-hop questions.
    pub phrase: Option<&'static str>,
}

/// The value domain of a free attribute.
pub(crate) enum AttrKind {
    /// "yes" or "no"; only "yes" can appear as a multi-hop constraint.
    Flag {
        /// Probability of "yes".
        yes_share: f64,
    },
    /// One of a fixed list of lowercase values.
    Choice(&'static [&'static str]),
    /// A whole number with a unit. `format` and `alts` use `{}` for the number; a multi-hop
    /// constraint on it means "at least this much".
    Number {
        /// The values drawn from.
        values: &'static [u32],
        /// How the stored value is written, e.g. `"{} ml"`.
        format: &'static str,
        /// Further accepted answer spellings, e.g. `"{} millilitres"`.
        alts: &'static [&'static str],
    },
    /// The largest laptop (in inches) that fits the product's width; stored as `"13-inch"`.
    Laptop,
    /// Volume in litres derived from the dimensions; stored as `"20 L"`.
    Litres,
}

/// Laptop sizes in inches, with the laptop's width and depth in centimetres.
pub(crate) const LAPTOPS: &[(u32, u32, u32)] = &[
    (11, 30, 20),
    (13, 31, 22),
    (14, 33, 23),
    (15, 36, 25),
    (16, 37, 26),
    (17, 40, 28),
];

/// How a laptop size is written in the catalog and in answers.
pub(crate) const LAPTOP_FORMAT: &str = "{}-inch";
/// Further accepted spellings of a laptop size.
pub(crate) const LAPTOP_ALTS: &[&str] = &["{} inch", "{} inches", "{} in"];
/// How a volume is written in the catalog and in answers.
pub(crate) const LITRES_FORMAT: &str = "{} L";
/// Further accepted spellings of a volume.
pub(crate) const LITRES_ALTS: &[&str] = &["{} litres", "{} liters", "{} l"];

/// One product category and everything needed to invent its products.
pub(crate) struct CategorySpec {
    /// Category as stored in `Product::category` (plural).
    pub name: &'static str,
    /// Singular noun used in multi-hop questions ("Which black bag ...").
    pub noun: &'static str,
    /// SKU prefix.
    pub sku_prefix: &'static str,
    /// Product type words that end a product name.
    pub types: &'static [&'static str],
    /// Colours; disjoint from every material list so questions parse unambiguously.
    pub colours: &'static [&'static str],
    /// Materials.
    pub materials: &'static [&'static str],
    /// Brands (one capitalised word each).
    pub brands: &'static [&'static str],
    /// Whole-dollar price range, inclusive.
    pub price: (u32, u32),
    /// Width range in cm, inclusive.
    pub width: (u32, u32),
    /// Height range in cm, inclusive.
    pub height: (u32, u32),
    /// Depth range in cm, inclusive.
    pub depth: (u32, u32),
    /// Free attributes.
    pub attrs: &'static [AttrSpec],
}

const WATER_RESISTANT: AttrSpec = AttrSpec {
    key: "water_resistant",
    kind: AttrKind::Flag { yes_share: 0.45 },
    presence: 1.0,
    question: "Is the {name} water-resistant?",
    phrase: Some("is water-resistant"),
};

const BAG_ATTRS: &[AttrSpec] = &[
    AttrSpec {
        key: "laptop_size",
        kind: AttrKind::Laptop,
        presence: 0.6,
        question: "What laptop size fits in the {name}?",
        phrase: Some("fits a {}-inch laptop"),
    },
    AttrSpec {
        key: "capacity",
        kind: AttrKind::Litres,
        presence: 1.0,
        question: "What is the capacity of the {name}?",
        phrase: Some("holds at least {} L"),
    },
    AttrSpec {
        key: "closure",
        kind: AttrKind::Choice(&["zip", "magnetic snap", "drawstring", "buckle", "flap"]),
        presence: 1.0,
        question: "What kind of closure does the {name} have?",
        phrase: Some("has a {} closure"),
    },
    WATER_RESISTANT,
    AttrSpec {
        key: "strap",
        kind: AttrKind::Choice(&["shoulder", "crossbody", "top handle", "detachable"]),
        presence: 1.0,
        question: "What type of strap does the {name} have?",
        phrase: Some("has a {} strap"),
    },
];

const BACKPACK_ATTRS: &[AttrSpec] = &[
    AttrSpec {
        key: "laptop_size",
        kind: AttrKind::Laptop,
        presence: 0.85,
        question: "What laptop size fits in the {name}?",
        phrase: Some("fits a {}-inch laptop"),
    },
    AttrSpec {
        key: "capacity",
        kind: AttrKind::Litres,
        presence: 1.0,
        question: "What is the capacity of the {name}?",
        phrase: Some("holds at least {} L"),
    },
    AttrSpec {
        key: "closure",
        kind: AttrKind::Choice(&["zip", "roll-top", "drawstring", "buckle"]),
        presence: 1.0,
        question: "What kind of closure does the {name} have?",
        phrase: Some("has a {} closure"),
    },
    WATER_RESISTANT,
    AttrSpec {
        key: "hip_belt",
        kind: AttrKind::Flag { yes_share: 0.3 },
        presence: 1.0,
        question: "Does the {name} have a hip belt?",
        phrase: Some("has a hip belt"),
    },
];

const SHOE_ATTRS: &[AttrSpec] = &[
    AttrSpec {
        key: "closure",
        kind: AttrKind::Choice(&["laces", "elastic", "velcro", "buckle"]),
        presence: 1.0,
        question: "How does the {name} fasten?",
        phrase: Some("fastens with {}"),
    },
    AttrSpec {
        key: "sole",
        kind: AttrKind::Choice(&["rubber", "foam", "crepe", "cork"]),
        presence: 1.0,
        question: "What is the sole of the {name} made of?",
        phrase: Some("has a {} sole"),
    },
    AttrSpec {
        key: "waterproof",
        kind: AttrKind::Flag { yes_share: 0.35 },
        presence: 1.0,
        question: "Is the {name} waterproof?",
        phrase: Some("is waterproof"),
    },
    AttrSpec {
        key: "weight",
        kind: AttrKind::Number {
            values: &[260, 300, 340, 380, 420, 460, 500, 540, 580, 620],
            format: "{} g",
            alts: &["{} grams"],
        },
        presence: 1.0,
        question: "How much does the {name} weigh?",
        phrase: None,
    },
    AttrSpec {
        key: "fit",
        kind: AttrKind::Choice(&["regular", "wide", "narrow"]),
        presence: 1.0,
        question: "What fit does the {name} have?",
        phrase: Some("has a {} fit"),
    },
];

const JACKET_ATTRS: &[AttrSpec] = &[
    AttrSpec {
        key: "hood",
        kind: AttrKind::Flag { yes_share: 0.55 },
        presence: 1.0,
        question: "Does the {name} have a hood?",
        phrase: Some("has a hood"),
    },
    AttrSpec {
        key: "insulation",
        kind: AttrKind::Choice(&["down", "synthetic", "fleece", "wool"]),
        presence: 1.0,
        question: "What insulation does the {name} have?",
        phrase: Some("has {} insulation"),
    },
    AttrSpec {
        key: "waterproof_rating",
        kind: AttrKind::Number {
            values: &[5000, 10000, 15000, 20000],
            format: "{} mm",
            alts: &["{} millimetres", "{} millimeters"],
        },
        presence: 0.7,
        question: "What is the waterproof rating of the {name}?",
        phrase: Some("has a waterproof rating of at least {} mm"),
    },
    AttrSpec {
        key: "fit",
        kind: AttrKind::Choice(&["regular", "slim", "relaxed"]),
        presence: 1.0,
        question: "What fit does the {name} have?",
        phrase: Some("has a {} fit"),
    },
    AttrSpec {
        key: "pockets",
        kind: AttrKind::Number {
            values: &[2, 3, 4, 5, 6, 7, 8],
            format: "{}",
            alts: &["{} pockets"],
        },
        presence: 1.0,
        question: "How many pockets does the {name} have?",
        phrase: Some("has at least {} pockets"),
    },
];

const LAMP_ATTRS: &[AttrSpec] = &[
    AttrSpec {
        key: "wattage",
        kind: AttrKind::Number {
            values: &[4, 6, 8, 10, 12, 15, 20],
            format: "{} W",
            alts: &["{} watts", "{} w"],
        },
        presence: 1.0,
        question: "What is the wattage of the {name}?",
        phrase: None,
    },
    AttrSpec {
        key: "color_temperature",
        kind: AttrKind::Number {
            values: &[2200, 2700, 3000, 4000],
            format: "{} K",
            alts: &["{} kelvin", "{} k"],
        },
        presence: 1.0,
        question: "What is the colour temperature of the {name}?",
        phrase: None,
    },
    AttrSpec {
        key: "dimmable",
        kind: AttrKind::Flag { yes_share: 0.5 },
        presence: 1.0,
        question: "Is the {name} dimmable?",
        phrase: Some("is dimmable"),
    },
    AttrSpec {
        key: "power",
        kind: AttrKind::Choice(&["mains", "battery", "usb"]),
        presence: 1.0,
        question: "How is the {name} powered?",
        phrase: Some("is {} powered"),
    },
];

const CHAIR_ATTRS: &[AttrSpec] = &[
    AttrSpec {
        key: "max_load",
        kind: AttrKind::Number {
            values: &[100, 110, 120, 130, 150],
            format: "{} kg",
            alts: &["{} kilograms"],
        },
        presence: 1.0,
        question: "What is the maximum load of the {name}?",
        phrase: Some("supports at least {} kg"),
    },
    AttrSpec {
        key: "armrests",
        kind: AttrKind::Flag { yes_share: 0.45 },
        presence: 1.0,
        question: "Does the {name} have armrests?",
        phrase: Some("has armrests"),
    },
    AttrSpec {
        key: "adjustable_height",
        kind: AttrKind::Flag { yes_share: 0.3 },
        presence: 1.0,
        question: "Does the {name} have an adjustable height?",
        phrase: Some("has an adjustable height"),
    },
    AttrSpec {
        key: "assembly_required",
        kind: AttrKind::Flag { yes_share: 0.5 },
        presence: 1.0,
        question: "Does the {name} require assembly?",
        phrase: Some("requires assembly"),
    },
];

const MUG_ATTRS: &[AttrSpec] = &[
    AttrSpec {
        key: "capacity",
        kind: AttrKind::Number {
            values: &[250, 300, 350, 400, 450, 500, 600],
            format: "{} ml",
            alts: &["{} millilitres", "{} milliliters"],
        },
        presence: 1.0,
        question: "What is the capacity of the {name}?",
        phrase: Some("holds at least {} ml"),
    },
    AttrSpec {
        key: "dishwasher_safe",
        kind: AttrKind::Flag { yes_share: 0.6 },
        presence: 1.0,
        question: "Is the {name} dishwasher-safe?",
        phrase: Some("is dishwasher-safe"),
    },
    AttrSpec {
        key: "microwave_safe",
        kind: AttrKind::Flag { yes_share: 0.5 },
        presence: 1.0,
        question: "Is the {name} microwave-safe?",
        phrase: Some("is microwave-safe"),
    },
    AttrSpec {
        key: "lid",
        kind: AttrKind::Flag { yes_share: 0.35 },
        presence: 1.0,
        question: "Does the {name} come with a lid?",
        phrase: Some("comes with a lid"),
    },
    AttrSpec {
        key: "insulated",
        kind: AttrKind::Flag { yes_share: 0.3 },
        presence: 1.0,
        question: "Is the {name} insulated?",
        phrase: Some("is insulated"),
    },
];

const HEADPHONE_ATTRS: &[AttrSpec] = &[
    AttrSpec {
        key: "form_factor",
        kind: AttrKind::Choice(&["over-ear", "on-ear", "in-ear"]),
        presence: 1.0,
        question: "What form factor does the {name} have?",
        phrase: Some("is {}"),
    },
    AttrSpec {
        key: "connectivity",
        kind: AttrKind::Choice(&["bluetooth", "wired", "usb-c"]),
        presence: 1.0,
        question: "How does the {name} connect?",
        phrase: Some("connects via {}"),
    },
    AttrSpec {
        // Wired products drop this attribute after drawing (see `retail::draw_attributes`).
        key: "battery_life",
        kind: AttrKind::Number {
            values: &[12, 20, 24, 30, 40, 50, 60],
            format: "{} hours",
            alts: &["{} h", "{} hrs"],
        },
        presence: 1.0,
        question: "How long does the battery of the {name} last?",
        phrase: Some("has at least {} hours of battery life"),
    },
    AttrSpec {
        key: "noise_cancelling",
        kind: AttrKind::Flag { yes_share: 0.45 },
        presence: 1.0,
        question: "Does the {name} have noise cancelling?",
        phrase: Some("has noise cancelling"),
    },
    AttrSpec {
        key: "microphone",
        kind: AttrKind::Flag { yes_share: 0.6 },
        presence: 1.0,
        question: "Does the {name} have a microphone?",
        phrase: Some("has a microphone"),
    },
];

/// The eight categories, in the order products are dealt to them.
// Compact rows keep each category's vocabulary on a few lines.
#[rustfmt::skip]
pub(crate) const CATEGORIES: &[CategorySpec] = &[
    CategorySpec {
        name: "bags",
        noun: "bag",
        sku_prefix: "BAG",
        types: &["Tote", "Satchel", "Duffel", "Crossbody", "Clutch", "Messenger"],
        colours: &["black", "tan", "navy", "olive", "burgundy", "cream", "grey", "cognac"],
        materials: &["leather", "canvas", "nylon", "suede", "waxed cotton", "recycled polyester"],
        brands: &["Northvale", "Corvell", "Brightwater", "Hollis", "Marlowe", "Fenwick"],
        price: (25, 320),
        width: (20, 52),
        height: (15, 40),
        depth: (5, 22),
        attrs: BAG_ATTRS,
    },
    CategorySpec {
        name: "backpacks",
        noun: "backpack",
        sku_prefix: "BPK",
        types: &["Backpack", "Daypack", "Rucksack", "Pack"],
        colours: &["black", "charcoal", "navy", "olive", "forest green", "mustard", "sand", "red"],
        materials: &["nylon", "canvas", "recycled nylon", "polyester", "waxed canvas", "ripstop"],
        brands: &["Northvale", "Trailcraft", "Summitry", "Wayfarer", "Basalt", "Corvell"],
        price: (35, 260),
        width: (26, 40),
        height: (38, 58),
        depth: (12, 26),
        attrs: BACKPACK_ATTRS,
    },
    CategorySpec {
        name: "shoes",
        noun: "shoe",
        sku_prefix: "SHO",
        types: &["Sneaker", "Boot", "Loafer", "Runner", "Trainer", "Derby"],
        colours: &["black", "white", "tan", "navy", "grey", "brown", "burgundy", "olive"],
        materials: &["leather", "suede", "mesh", "canvas", "knit", "nubuck"],
        brands: &["Strideon", "Corvell", "Pacewell", "Hollis", "Treadway", "Ardent"],
        price: (45, 280),
        width: (9, 12),
        height: (8, 18),
        depth: (26, 32),
        attrs: SHOE_ATTRS,
    },
    CategorySpec {
        name: "jackets",
        noun: "jacket",
        sku_prefix: "JKT",
        types: &["Parka", "Bomber", "Anorak", "Windbreaker", "Shell", "Jacket"],
        colours: &["black", "navy", "olive", "khaki", "red", "grey", "forest green", "mustard"],
        materials: &["nylon", "wool", "cotton", "polyester", "leather", "denim", "softshell"],
        brands: &["Northvale", "Fjordline", "Basalt", "Marlowe", "Wayfarer", "Glacierline"],
        price: (60, 460),
        width: (30, 40),
        height: (5, 12),
        depth: (25, 35),
        attrs: JACKET_ATTRS,
    },
    CategorySpec {
        name: "lamps",
        noun: "lamp",
        sku_prefix: "LMP",
        types: &["Lamp", "Lantern", "Sconce", "Pendant", "Uplight"],
        colours: &["black", "white", "matte grey", "sage", "terracotta", "cream", "navy", "copper"],
        materials: &[
            "brass", "steel", "ceramic", "glass", "oak", "aluminium", "rattan", "concrete",
        ],
        brands: &["Lumeno", "Halden", "Brightwater", "Ostra", "Vellum", "Candela"],
        price: (19, 360),
        width: (12, 50),
        height: (20, 180),
        depth: (12, 50),
        attrs: LAMP_ATTRS,
    },
    CategorySpec {
        name: "chairs",
        noun: "chair",
        sku_prefix: "CHR",
        types: &["Chair", "Stool", "Armchair", "Rocker", "Lounger"],
        colours: &["black", "white", "natural", "chestnut", "sage", "charcoal", "mustard", "navy"],
        materials: &["oak", "walnut", "steel", "rattan", "plastic", "velvet", "beech", "leather"],
        brands: &["Halden", "Sitwell", "Ostra", "Fenwick", "Arborline", "Joinery"],
        price: (49, 620),
        width: (38, 90),
        height: (45, 110),
        depth: (40, 90),
        attrs: CHAIR_ATTRS,
    },
    CategorySpec {
        name: "mugs",
        noun: "mug",
        sku_prefix: "MUG",
        types: &["Mug", "Tumbler", "Cup", "Beaker"],
        colours: &[
            "white", "black", "sage", "terracotta", "sky blue", "cream", "charcoal", "mustard",
        ],
        materials: &[
            "ceramic", "stoneware", "porcelain", "stainless steel", "enamel", "glass", "bamboo",
        ],
        brands: &["Kilnworks", "Ostra", "Brightwater", "Morrow", "Claypath", "Halden"],
        price: (8, 48),
        width: (7, 11),
        height: (8, 18),
        depth: (7, 11),
        attrs: MUG_ATTRS,
    },
    CategorySpec {
        name: "headphones",
        noun: "headset",
        sku_prefix: "HPH",
        types: &["Headphones", "Earbuds", "Headset", "Buds"],
        colours: &["black", "white", "silver", "navy", "graphite", "rose", "sage", "red"],
        materials: &["plastic", "aluminium", "magnesium", "steel", "leatherette", "silicone"],
        brands: &["Auralis", "Tonecraft", "Hushline", "Basalt", "Resona", "Quillon"],
        price: (19, 420),
        width: (4, 20),
        height: (3, 22),
        depth: (3, 10),
        attrs: HEADPHONE_ATTRS,
    },
];

/// First words of product names; disjoint from `NAME_SECOND` so no name hides inside another.
// One word per line would make these lists hundreds of lines long.
#[rustfmt::skip]
pub(crate) const NAME_FIRST: &[&str] = &[
    "Aurora", "Cobalt", "Ember", "Juniper", "Saffron", "Onyx", "Willow", "Meridian", "Solstice",
    "Nimbus", "Halcyon", "Cedar", "Falcon", "Sierra", "Tundra", "Marigold", "Indigo", "Sable",
    "Cypress", "Orchid", "Zephyr", "Atlas", "Nova", "Obsidian", "Quartz", "Raven", "Sequoia",
    "Tamarind", "Umber", "Vesper", "Wren", "Yarrow", "Zenith", "Amber", "Birch", "Citrine", "Dune",
    "Echo", "Fable", "Garnet", "Heron", "Iris", "Jasper", "Lark", "Maple", "Nectar", "Opal",
    "Pebble", "Rowan", "Sparrow", "Thistle", "Whisper", "Alder", "Beacon", "Comet", "Elm", "Fern",
    "Hazel", "Ivy", "Jade", "Kite", "Lotus", "Mistral", "Nomad", "Orbit", "Pine", "Rook", "Tidal",
    "Aspen", "Bramble", "Cinder", "Dusk", "Flint", "Galena", "Hollyhock", "Lumen", "Monsoon",
    "Pollen", "Solace", "Tempest",
];

/// Second words of two-word product names.
// One word per line would make these lists hundreds of lines long.
#[rustfmt::skip]
pub(crate) const NAME_SECOND: &[&str] = &[
    "Ridge", "Harbor", "Summit", "Canyon", "Meadow", "Peak", "Hollow", "Drift", "Grove", "Crest",
    "Bay", "Field", "Trail", "Creek", "Stone", "Glen", "Brook", "Moor", "Cove", "Mesa", "Fjord",
    "Pass", "Bluff", "Reef", "Isle", "Dell", "Marsh", "Point", "Spire", "Haven", "Heath", "Ledge",
    "Strand", "Vista", "Arbor", "Crag", "Knoll", "Shore", "Dale", "Fell", "Tor", "Loch", "Rise",
    "Sound", "Wharf", "Quay", "Pier", "Gate",
];

/// Stores as (id, city).
pub(crate) const STORES: &[(&str, &str)] = &[
    ("LYO", "Lyon"),
    ("PAR", "Paris"),
    ("BER", "Berlin"),
    ("LON", "London"),
    ("MAD", "Madrid"),
    ("MIL", "Milan"),
    ("NYC", "New York"),
    ("CHI", "Chicago"),
];

/// Street names of store addresses; two words, so an address is three words with its number.
pub(crate) const STREETS: &[&str] = &[
    "Market Street",
    "Harbor Road",
    "Station Square",
    "Canal Street",
    "Park Avenue",
    "Mill Lane",
    "Bridge Street",
    "King Street",
    "Castle Road",
    "Garden Row",
];

/// First words of the alternate vocabulary's product names: disjoint from both standard lists,
/// so a catalog generated with it names no product the standard catalog could.
// One word per line would make these lists hundreds of lines long.
#[rustfmt::skip]
pub(crate) const ALT_NAME_FIRST: &[&str] = &[
    "Acorn", "Basil", "Cascade", "Dahlia", "Eclipse", "Foxglove", "Glacier", "Harvest", "Inlet",
    "Kestrel", "Lagoon", "Mosaic", "Nettle", "Oriole", "Paprika", "Quill", "Rosewood", "Sorrel",
    "Topaz", "Violet", "Wisteria", "Yucca", "Azure", "Blossom", "Cobble", "Driftwood", "Emberly",
    "Fennel", "Gossamer", "Hemlock", "Kelp", "Linden", "Magnolia", "Nutmeg", "Oakmoss", "Plover",
    "Russet", "Sundew", "Tansy", "Verdant",
];

/// Second words of the alternate vocabulary's two-word product names.
// One word per line would make these lists hundreds of lines long.
#[rustfmt::skip]
pub(crate) const ALT_NAME_SECOND: &[&str] = &[
    "Terrace", "Orchard", "Lantern", "Anchor", "Compass", "Quarry", "Prairie", "Tarn",
    "Barrow", "Outpost", "Causeway", "Paddock", "Hamlet", "Atrium", "Bastion", "Cairn",
    "Estuary", "Foothill", "Garrison", "Headland",
];

/// The alternate vocabulary's stores as (id, city).
pub(crate) const ALT_STORES: &[(&str, &str)] = &[
    ("OSL", "Oslo"),
    ("VIE", "Vienna"),
    ("LIS", "Lisbon"),
    ("DUB", "Dublin"),
    ("TOR", "Toronto"),
    ("SEA", "Seattle"),
    ("SYD", "Sydney"),
    ("ZRH", "Zurich"),
];
