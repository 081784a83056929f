"""Protocol names as nfdump 1.7 prints them in its csv output (``pr``).

The worker asks nfdump for plain numbers (``-N``, so that packet and byte
counters are exact) and maps the protocol number to nfdump's own name here.
The list was read off nfdump 1.7.1 itself: nfpcapd turned a pcap with one
packet per IP protocol into an nfcapd file and nfdump printed each name; the
four protocols nfpcapd decapsulates (4, 17, 41, 47) were filled in from
nfdump's name table. Numbers nfdump has no name for print as the number.
"""

PROTOCOL_NAMES = (
    "0", "ICMP", "IGMP", "GGP", "IPIP", "ST", "TCP", "CBT",  # 0-7
    "EGP", "IGP", "BBN", "NVPII", "PUP", "ARGUS", "ENCOM", "XNET",  # 8-15
    "CHAOS", "UDP", "MUX", "DCN", "HMP", "PRM", "XNS", "Trnk1",  # 16-23
    "Trnk2", "Leaf1", "Leaf2", "RDP", "IRTP", "ISO-4", "NETBK", "MFESP",  # 24-31
    "MEINP", "DCCP", "3PC", "IDPR", "XTP", "DDP", "IDPR", "TP++",  # 32-39
    "IL", "IPv6", "SDRP", "Rte6", "Frag6", "IDRP", "RSVP", "GRE",  # 40-47
    "MHRP", "BNA", "ESP", "AH", "INLSP", "SWIPE", "NARP", "MOBIL",  # 48-55
    "TLSP", "SKIP", "ICMP6", "NOHE6", "OPTS6", "HOST", "CFTP", "NET",  # 56-63
    "SATNT", "KLAN", "RVD", "IPPC", "FS", "SATM", "VISA", "IPCV",  # 64-71
    "CPNX", "CPHB", "WSN", "PVP", "BSATM", "SUNND", "WBMON", "WBEXP",  # 72-79
    "ISOIP", "VMTP", "SVMTP", "VINES", "TTP", "NSIGP", "DGP", "TCF",  # 80-87
    "EIGRP", "OSPF", "S-RPC", "LARP", "MTP", "AX.25", "OS", "MICP",  # 88-95
    "SCCSP", "ETHIP", "ENCAP", "99", "GMTP", "IFMP", "PNNI", "PIM",  # 96-103
    "ARIS", "SCPS", "QNX", "A/N", "IPcmp", "SNP", "CpqPP", "IPXIP",  # 104-111
    "VRRP", "PGM", "0hop", "L2TP", "DDX", "IATP", "STP", "SRP",  # 112-119
    "UTI", "SMP", "SM", "PTP", "ISIS4", "FIRE", "CRTP", "CRUDP",  # 120-127
    "128", "IPLT", "SPS", "PIPE", "SCTP", "FC", "134", "MHEAD",  # 128-135
    "UDP-L", "MPLS", "138", "139", "140", "141", "142", "143",  # 136-143
    "144", "145", "146", "147", "148", "149", "150", "151",  # 144-151
    "152", "153", "154", "155", "156", "157", "158", "159",  # 152-159
    "160", "161", "162", "163", "164", "165", "166", "167",  # 160-167
    "168", "169", "170", "171", "172", "173", "174", "175",  # 168-175
    "176", "177", "178", "179", "180", "181", "182", "183",  # 176-183
    "184", "185", "186", "187", "188", "189", "190", "191",  # 184-191
    "192", "193", "194", "195", "196", "197", "198", "199",  # 192-199
    "200", "201", "202", "203", "204", "205", "206", "207",  # 200-207
    "208", "209", "210", "211", "212", "213", "214", "215",  # 208-215
    "216", "217", "218", "219", "220", "221", "222", "223",  # 216-223
    "224", "225", "226", "227", "228", "229", "230", "231",  # 224-231
    "232", "233", "234", "235", "236", "237", "238", "239",  # 232-239
    "240", "241", "242", "243", "244", "245", "246", "247",  # 240-247
    "248", "249", "250", "251", "252", "253", "254", "255",  # 248-255
)
assert len(PROTOCOL_NAMES) == 256
